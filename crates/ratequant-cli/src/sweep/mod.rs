//! `ratequant sweep` bookkeeping: the journal that makes a sweep resumable, and the report
//! (tables, CSV/JSON, SVG figures) written from it.

pub mod journal;
pub mod report;
pub mod svg;
