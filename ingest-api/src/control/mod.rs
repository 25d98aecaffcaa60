//! The control plane: tenants, users, teams, API keys, invitations and SSO settings over HTTP
//! (`http`, `invitations`, with their guards as extractors), budgets and notification
//! channels (`alerts`), alert rules (`rules`), the writes they share with the operator CLI
//! (`store`), and the CLI itself (`cli`).

pub mod alerts;
pub mod cli;
pub mod http;
pub mod integrations;
pub mod invitations;
pub mod rules;
pub mod store;
