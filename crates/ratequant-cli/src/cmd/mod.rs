//! One module per command, each exposing `<Name>Args` and `run`.

pub mod allocate;
pub mod calibrate;
pub mod eval;
pub mod fetch;
pub mod fit;
pub mod generate;
pub mod sweep;
