//! Model architectures (files named after the architecture, fields after checkpoint keys).

pub mod gemma4;
