pub mod audit;
pub mod dashboard;
pub mod health;
