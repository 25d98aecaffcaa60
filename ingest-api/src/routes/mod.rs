pub mod auth;
pub mod control;
pub mod events;
pub mod health;
pub mod influx;
pub mod invitations;
pub mod promrw;
pub mod sso;
