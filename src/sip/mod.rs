//! SIP federation edge: codec, validation, framing, transactions, dialogs.
