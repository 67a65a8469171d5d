//! Money in rows: [`Micros`] and [`MicrosPerM`] bind and decode as the
//! `BIGINT` the schema stores, on both backends. A value above `i64::MAX`
//! cannot be written and a negative one cannot be read (the schema's
//! `CHECK (… >= 0)` keeps them out): both are driver errors, never a
//! wrapped-around amount.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Encode, Type};

use crate::money::{Micros, MicrosPerM};

macro_rules! bigint_money {
    ($t:ty) => {
        impl<DB: Database> Type<DB> for $t
        where
            i64: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <i64 as Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <i64 as Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: Database> Encode<'q, DB> for $t
        where
            i64: Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as Database>::ArgumentBuffer<'q>,
            ) -> Result<IsNull, BoxDynError> {
                let v = i64::try_from(self.0)?;
                <i64 as Encode<'q, DB>>::encode_by_ref(&v, buf)
            }
        }

        impl<'r, DB: Database> Decode<'r, DB> for $t
        where
            i64: Decode<'r, DB>,
        {
            fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let v = <i64 as Decode<'r, DB>>::decode(value)?;
                Ok(Self(u64::try_from(v)?))
            }
        }
    };
}

bigint_money!(Micros);
bigint_money!(MicrosPerM);

/// Refuse an amount the database cannot hold before any row changes.
pub(super) fn storable(m: Micros) -> Result<Micros, super::StoreError> {
    if i64::try_from(m.0).is_ok() {
        Ok(m)
    } else {
        Err(super::StoreError::AmountOutOfRange)
    }
}
