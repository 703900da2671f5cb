//! Character properties shared by everything that shows or checks untrusted
//! text (chat command errors, host names from agents).

use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory};
use icu_properties::{CodePointMapData, CodePointSetData};

/// `true` for characters that are invisible or change how neighbouring text
/// is shown, so they must not reach a person unescaped: Unicode general
/// category `Cf` (format: zero-width space and joiners, bidirectional
/// overrides and isolates, soft hyphen, BOM, Arabic number signs, tags, …)
/// and `Default_Ignorable_Code_Point` (variation selectors, combining
/// grapheme joiner, Hangul fillers, unassigned code points reserved as
/// ignorable, …), both from the Unicode Character Database as shipped by
/// `icu_properties`.
///
/// Also `U+13440`–`U+1345F` (Egyptian hieroglyph blanks and damage
/// modifiers next to the hieroglyph format controls), which render blank
/// or as overlays and were rejected before this shared definition existed.
///
/// Control characters and whitespace are not included: callers treat them
/// separately (`char::is_control`, `char::is_whitespace`); no character is
/// both.
#[must_use]
pub fn is_invisible(c: char) -> bool {
    CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
        || CodePointMapData::<GeneralCategory>::new().get(c) == GeneralCategory::Format
        || ('\u{13440}'..='\u{1345F}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::is_invisible;

    /// The hand-made tables this function replaced (`command.rs` and
    /// `firewall/domain.rs`); everything in either stays invisible.
    fn old_tables(c: char) -> bool {
        matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1345F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
    }

    #[test]
    fn covers_both_old_tables() {
        let missing: Vec<String> = (0..=0x10_FFFF)
            .filter_map(char::from_u32)
            .filter(|&c| old_tables(c) && !is_invisible(c))
            .map(|c| format!("U+{:04X}", u32::from(c)))
            .collect();
        assert!(missing.is_empty(), "no longer invisible: {missing:?}");
    }

    #[test]
    fn never_control_or_whitespace() {
        for c in (0..=0x10_FFFF).filter_map(char::from_u32) {
            if is_invisible(c) {
                assert!(
                    !c.is_control() && !c.is_whitespace(),
                    "U+{:04X}",
                    u32::from(c)
                );
            }
        }
    }

    #[test]
    fn visible_text_is_not_invisible() {
        for c in [
            'a',
            'Z',
            '0',
            ' ',
            '-',
            '\u{e9}',
            '\u{416}',
            '\u{4e2d}',
            '\u{1f600}',
            '\u{ff1b}',
        ] {
            assert!(!is_invisible(c), "U+{:04X}", u32::from(c));
        }
    }
}
