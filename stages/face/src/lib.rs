//! lipsync face stage (being built).
