//! Helpers shared by minivmm's integration tests (in `tests/tests/`).
