//! The CUDA backend (being written).

/// Whether a usable GPU is present: its name, or why not.
pub fn probe() -> Result<String, String> {
    Err("the CUDA backend is not built yet".into())
}
