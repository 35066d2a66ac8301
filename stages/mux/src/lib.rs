//! lipsync mux stage (being built).
