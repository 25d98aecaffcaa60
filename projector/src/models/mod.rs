//! The read models a batch writes, one room each: what an event becomes in it (the fold)
//! and the SQL that writes it. Every write runs in the batch's transaction with
//! `search_path` pointing at the tenant's schema; [`crate::batch`] calls them in order.

pub mod attribution;
pub mod audit;
pub mod people;
pub mod raw;
pub mod rollups;
pub mod sessions;
pub mod watermark;
