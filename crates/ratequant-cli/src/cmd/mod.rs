//! One module per command, each exposing `<Name>Args` and `run`.

pub mod allocate;
pub mod eval;
pub mod fetch;
pub mod fit;
