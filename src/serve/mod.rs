//! The serving core: everything between a decoded request and its answer, and
//! every admin change on the way.
//!
//! [`engine::Engine`] is the library's serving API. It turns inputs into tensors
//! ([`preprocess`]) once [`admission`] lets their decode start, queues them for
//! the compute workers ([`batch`]), which read one snapshot of the profile table
//! ([`profile`]) per batch, and replace a worker whose batch panicked; a request that names no
//! profile is served by the [`activation`] covering its source, else the default;
//! [`events`] turn weather and sensor reports into activations by rules. An admin change
//! ([`change`]) is checked against the current [`state`], carried by a store (the
//! local state file, or etcd in [`fleet`] mode), and applied by the [`registry`],
//! which reconciles the table to the new state and appends it to the audit
//! [`journal`]. [`metrics`] names what is exported. Nothing here knows a
//! wire protocol (that is [`crate::server`]) or the research pipeline ([`crate::lab`]).

pub mod activation;
pub mod admission;
pub mod auto;
pub mod batch;
pub mod change;
pub mod compute;
pub mod durability;
pub mod engine;
pub mod events;
pub mod fleet;
pub mod journal;
pub mod load;
pub mod metrics;
pub mod preprocess;
pub mod profile;
pub mod registry;
pub mod shadow;
pub mod state;
pub mod traffic;
