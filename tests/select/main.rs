//! The training-free selectors (`kvzip`, `snapkv`, `streaming`): the kept
//! (layer, head, position) sets against a brute-force reference, per-head
//! sets through a .sack and back into the decoder, and every compressor
//! through the binary. One test binary, so it links once.

#[path = "../common/mod.rs"]
mod common;
mod files;
mod kept;
mod reference;
