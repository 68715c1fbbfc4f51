//! Node configuration (TOML): schema, defaults and validation with file:line errors.
