//! What the crate's enums get from one list instead of hand-written tables:
//!
//! * [`numbered_enum!`]: an enum whose variants stand for numbers (the
//!   serve protocol's opcodes, Nix's build statuses and verbosities, exit
//!   statuses) gets `From<Enum> for <number>` and `TryFrom<number>` from its
//!   discriminants, so a number is written once;
//! * [`serde_name`]: the name serde writes for a unit variant (its
//!   `rename_all` spelling), for the `Display` of enums that tickets carry,
//!   so that a log line and a ticket never spell a variant differently.

use serde::Serialize;

/// Defines an enum whose variants are numbers, and both conversions:
/// `<repr>::from(variant)` and `Enum::try_from(number)`, whose error is the
/// unknown number.
///
/// ```ignore
/// numbered_enum! {
///     #[derive(Debug, Clone, Copy)]
///     pub enum Command: u64 { QueryValidPaths = 1, QueryPathInfos = 2, }
/// }
/// ```
macro_rules! numbered_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl From<$name> for $repr {
            fn from(value: $name) -> $repr {
                value as $repr
            }
        }

        impl TryFrom<$repr> for $name {
            type Error = $repr;

            fn try_from(number: $repr) -> Result<$name, $repr> {
                match number {
                    $( $value => Ok($name::$variant), )+
                    other => Err(other),
                }
            }
        }
    };
}

pub(crate) use numbered_enum;

/// The name serde gives the unit variant `value` (`"timed-out"` for
/// `Kind::TimedOut` under `rename_all = "kebab-case"`); empty for anything
/// that does not serialise as a string.
pub(crate) fn serde_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    numbered_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        #[serde(rename_all = "kebab-case")]
        enum Sample: u64 {
            One = 1,
            /// A gap in the numbers.
            SeventySeven = 77,
        }
    }

    #[test]
    fn numbers_both_ways_and_names_from_serde() {
        assert_eq!(u64::from(Sample::SeventySeven), 77);
        assert_eq!(Sample::try_from(1), Ok(Sample::One));
        assert_eq!(Sample::try_from(2), Err(2));
        assert_eq!(super::serde_name(&Sample::SeventySeven), "seventy-seven");
        assert_eq!(super::serde_name(&7), "");
    }
}
