//! The compute plane: the Machines API (plans, regions, images, lifecycle) over
//! provider adapters (Vultr, DigitalOcean), and pay-per-request code execution.
