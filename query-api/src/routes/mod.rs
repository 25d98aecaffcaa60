pub mod dashboard;
pub mod health;
