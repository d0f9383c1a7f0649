//! Service addresses in userspace mode.
