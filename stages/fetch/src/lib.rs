//! lipsync fetch stage: SSRF-guarded streaming download ([`guard`], [`download`]) and
//! probing, validation and audio conversion of the inputs ([`probe`]).

pub mod download;
pub mod guard;
pub mod probe;
