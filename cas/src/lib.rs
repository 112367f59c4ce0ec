//! Content-addressed storage.
