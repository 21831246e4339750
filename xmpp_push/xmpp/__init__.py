"""The XEP-0114 component: the XMPP adapter around the core."""
