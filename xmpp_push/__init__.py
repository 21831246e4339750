"""xmpp-push: wake phones through APNs and FCM for any XMPP server."""

__version__ = "0.1.0"
__all__ = ["__version__"]
