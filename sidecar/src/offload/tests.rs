//! Unit tests of attention offload.
