//! End-to-end tests of the `.sack` format: whole files through the writer and
//! reader, damaged files, the `sac info` binary, the Python reference reader
//! and the fuzz seed corpus. One test binary, so it links once.

mod cli;
mod common;
mod mutation;
mod python;
mod roundtrip;
mod seeds;
