pub mod audit;
pub mod dashboard;
pub mod explore;
pub mod health;
pub mod people;
pub mod stream;
pub mod tables;
