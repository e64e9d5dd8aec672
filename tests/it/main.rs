//! Integration tests: real RabbitMQ, real Postgres, a scripted fake provider (wiremock).
//! Each test gets its own database and its own exchange/queue prefix (see `support`).

mod byok;
mod dead_letters;
mod edits;
mod egress;
mod faults;
mod leak;
mod ops;
mod proxy;
mod replicas;
mod skeleton;
mod support;
mod workers;
