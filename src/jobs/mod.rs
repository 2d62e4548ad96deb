//! Jobs: the job workers that claim due jobs and run each as the role that
//! enqueued it (`worker`), and the helpers of `sql/jobs.sql`.

pub mod worker;
