//! Building blocks shared by every architecture: the families differ by config and
//! weight names, never by copied layer code.

mod linear;
pub mod matvec;
pub(crate) mod matvec_q8;
mod mlp;
mod norm;
pub(crate) mod rope;
pub mod vexp;

pub use linear::{format_name, parse_format, Linear, LoraAdapter, Quantization};
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rope::Rope;
