//! Decoding result rows by position, with the column types checked once per result.
//!
//! sqlx's `FromRow` and `Row::try_get` look every column up by name and check its type against
//! the Rust type on every row, which for the batched reads cost more than the decoding itself
//! (callgrind, session validation at 64 connections: 5.8k of 51k instructions per request went
//! to reading its row; 3.5k of 48.7k this way). Every row of one result has the same columns,
//! so [`decode_all`] checks their names and types on the first row only and reads the rest by
//! position.

use sqlx::postgres::{PgRow, Postgres};
use sqlx::{Column, Decode, Row, Type};

/// The columns of one row, read in order with [`Cols::next`].
pub(crate) struct Cols<'r> {
    row: &'r PgRow,
    next: usize,
    check: bool,
}

impl<'r> Cols<'r> {
    /// Reads `row` with every column's name and type checked (a lone row, e.g. from `FromRow`).
    pub fn checked(row: &'r PgRow) -> Self {
        Self {
            row,
            next: 0,
            check: true,
        }
    }

    /// Decodes the next column, which must be called `name`, as `T`.
    pub fn next<T: Decode<'r, Postgres> + Type<Postgres>>(
        &mut self,
        name: &str,
    ) -> Result<T, sqlx::Error> {
        let i = self.next;
        self.next += 1;
        if self.check {
            let column = self.row.try_column(i)?;
            // The column's declared type, so a NULL in the first row is checked too.
            let ty = column.type_info();
            let problem = if column.name() != name {
                Some(format!(
                    "expected column {name:?}, found {:?}",
                    column.name()
                ))
            } else if !T::compatible(ty) {
                Some(format!(
                    "column {name:?} is {ty}, read as {}",
                    T::type_info()
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(sqlx::Error::ColumnDecode {
                    index: i.to_string(),
                    source: problem.into(),
                });
            }
        }
        self.row.try_get_unchecked(i)
    }
}

/// Decodes every row of one result with `read`, checking the column types on the first.
pub(crate) fn decode_all<'r, T>(
    rows: &'r [PgRow],
    read: impl Fn(&mut Cols<'r>) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, sqlx::Error> {
    rows.iter()
        .enumerate()
        .map(|(n, row)| {
            read(&mut Cols {
                row,
                next: 0,
                check: n == 0,
            })
        })
        .collect()
}
