//! The firewall side: what may reach OPNsense.
//!
//! - [`domain`]: domain normalisation (lowercase, IDNA/UTS-46) and validation, so that only
//!   plain host names, never IPs, wildcards, URLs or look-alike names, reach the alias.
//! - [`opnsense`]: the OPNsense API client that adds approved domains to the host alias and
//!   applies it (`setItem` + `reconfigure`), removes what no grant covers any more, and reads
//!   what the alias holds now.
//! - [`policy`]: domains refused before any card (`SM_DENIED_DOMAINS`, names that resolve only
//!   to internal addresses).

pub mod domain;
pub mod opnsense;
pub mod policy;
