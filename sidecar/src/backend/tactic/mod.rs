//! Tactic selected on the backend's own device: each sequence's state as
//! device allocations, owned by the backend and grown by the same rules as
//! the CPU reference (`tacflow_kernels::tactic::TacticSeq`).
//!
//! | piece | file |
//! | --- | --- |
//! | the device memory the manager needs, and a host fake of it | [`mem`] |
//! | the states: sizing, growth, forks, truncation, close, a failed step undone | [`state`] |
//! | a node's entries planned and turned into the kernels' jobs | [`driver`] |
//! | the kernels' work done on the host (the CPU backend's device path) | [`host`] |
//! | what a selection kept, measured for diagnostics | [`measure`] |
//!
//! The arrays inside a state are laid out by
//! `tacflow_kernels::tactic::layout`, which the kernels read.

pub mod driver;
pub mod host;
pub mod measure;
pub mod mem;
pub mod state;

pub use measure::{MeasureAt, Selector, TacticMeasure};
pub use mem::{DeviceMemory, HostMemory};
pub use state::{ClusterRun, LayerPlan, StateId, TacticStates};
