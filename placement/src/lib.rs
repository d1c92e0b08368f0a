//! Storage profiles, the cluster map and placement of pieces across failure domains.
//!
//! Pure logic: no I/O, no async, no clocks, no randomized hashing. Everything here is a
//! deterministic function of its inputs so that every engine computes the same
//! placement from the same map, and so that it can be property-tested exhaustively.
