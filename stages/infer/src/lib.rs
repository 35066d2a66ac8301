//! lipsync infer stage (being built).
