//! Autoscaling (SPEC §7): [`policy`] decides from numbers alone; the
//! [`controller`] samples each app, asks the policy, and has the supervisor
//! apply the answer.

mod controller;
pub(crate) mod policy;

pub(crate) use self::controller::run;
pub(crate) use self::policy::{Decision, Placement, ReplicaSample, Sample};
