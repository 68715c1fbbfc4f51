//! Presence codecs (sans-IO): bytes ⇄ `wire` values. Every decoder refuses hostile XML
//! (DTDs, entity declarations, non-predefined entity references, oversized input) instead of
//! expanding or skipping it.
