//! The firewall side: what may reach OPNsense.
//!
//! - [`domain`]: domain normalisation (lowercase, IDNA/UTS-46) and validation, so that only
//!   plain host names, never IPs, wildcards, URLs or look-alike names, reach the alias.

pub mod domain;
