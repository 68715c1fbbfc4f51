//! XMPP edge: stream framing, s2s federation and the XEP-0114 link to home nodes.
