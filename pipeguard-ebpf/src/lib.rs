#![no_std]
//! Only the `pipeguard` binary target matters; this empty library lets the agent name
//! the crate as a build dependency.
