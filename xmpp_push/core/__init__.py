"""The core: registrations, policy, dispatch and outcomes. Knows nothing of XMPP or HTTP."""
