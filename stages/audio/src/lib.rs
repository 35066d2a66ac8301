//! lipsync audio stage (being built).
