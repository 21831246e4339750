"""Push networks behind one interface (`xmpp_push.core.ports.Provider`)."""
