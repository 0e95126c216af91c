//! The read planner: which requests a poll of the register map makes. Registers of one table
//! that are contiguous, or separated by a small gap, share one request, within the protocol's
//! limit (125 registers, 2000 bits), so a poll of ten neighbouring channels is one round trip.

use crate::config::{RegisterSettings, Table};

/// Largest gap (unmapped registers) bridged by reading through it: a few registers more in a
/// response cost far less than a second round trip. Bits are packed eight to a byte, so a
/// gap of bits is cheaper still.
pub const MAX_REGISTER_GAP: u16 = 4;
/// See [`MAX_REGISTER_GAP`].
pub const MAX_BIT_GAP: u16 = 32;

/// One read request and the registers its answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBlock {
    /// The table read.
    pub table: Table,
    /// The first address.
    pub start: u16,
    /// How many registers (or bits).
    pub count: u16,
    /// Indexes into the register map, in address order.
    pub members: Vec<usize>,
}

impl ReadBlock {
    /// Where register `address` sits in this block's answer.
    pub fn offset(&self, address: u16) -> usize {
        usize::from(address - self.start)
    }
}

/// Plans the requests for `registers` (validated: each fits its table's address space).
/// Blocks come table by table (holding, input, coil, discrete), in address order.
pub fn plan(registers: &[RegisterSettings]) -> Vec<ReadBlock> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| (registers[i].table, registers[i].address, i));
    let mut blocks: Vec<ReadBlock> = Vec::new();
    for i in order {
        let reg = &registers[i];
        let (start, end) = (reg.start(), reg.end());
        let gap = if reg.table.is_bits() {
            MAX_BIT_GAP
        } else {
            MAX_REGISTER_GAP
        };
        if let Some(block) = blocks.last_mut() {
            let block_end = u32::from(block.start) + u32::from(block.count);
            let joins = block.table == reg.table
                && u32::from(start) <= block_end + u32::from(gap)
                && end.max(block_end) - u32::from(block.start) <= u32::from(reg.table.max_read());
            if joins {
                block.count = (end.max(block_end) - u32::from(block.start)) as u16;
                block.members.push(i);
                continue;
            }
        }
        blocks.push(ReadBlock {
            table: reg.table,
            start,
            count: reg.data_type.width(),
            members: vec![i],
        });
    }
    blocks
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::DataType;

    fn reg(table: Table, address: u16, data_type: DataType) -> RegisterSettings {
        RegisterSettings::new(&format!("c{address}"), table, address, data_type)
    }

    fn spans(blocks: &[ReadBlock]) -> Vec<(Table, u16, u16)> {
        blocks.iter().map(|b| (b.table, b.start, b.count)).collect()
    }

    #[test]
    fn ten_contiguous_channels_are_one_request() {
        let regs: Vec<_> = (0..10)
            .map(|a| reg(Table::Input, a, DataType::Int16))
            .collect();
        let blocks = plan(&regs);
        assert_eq!(spans(&blocks), [(Table::Input, 0, 10)]);
        assert_eq!(blocks[0].members, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn mixed_widths_out_of_order_are_sorted_and_merged() {
        let regs = vec![
            reg(Table::Holding, 6, DataType::Float64), // 6..10
            reg(Table::Holding, 0, DataType::Uint32),  // 0..2
            reg(Table::Holding, 2, DataType::Float32), // 2..4
            reg(Table::Holding, 4, DataType::Int16),   // 4
        ];
        let blocks = plan(&regs);
        assert_eq!(spans(&blocks), [(Table::Holding, 0, 10)]);
        assert_eq!(blocks[0].members, [1, 2, 3, 0]);
        assert_eq!(blocks[0].offset(6), 6);
    }

    #[test]
    fn a_small_gap_is_read_through_a_large_one_splits() {
        let regs = vec![
            reg(Table::Input, 0, DataType::Int16),
            reg(Table::Input, 5, DataType::Int16), // gap of 4: bridged
            reg(Table::Input, 11, DataType::Int16), // gap of 5: new request
        ];
        assert_eq!(
            spans(&plan(&regs)),
            [(Table::Input, 0, 6), (Table::Input, 11, 1)]
        );
    }

    #[test]
    fn tables_never_share_a_request() {
        let regs = vec![
            reg(Table::Input, 0, DataType::Int16),
            reg(Table::Holding, 1, DataType::Int16),
            reg(Table::Coil, 0, DataType::Bool),
            reg(Table::Discrete, 0, DataType::Bool),
            reg(Table::Coil, 20, DataType::Bool), // bits: a gap of 19 is bridged
        ];
        assert_eq!(
            spans(&plan(&regs)),
            [
                (Table::Holding, 1, 1),
                (Table::Input, 0, 1),
                (Table::Coil, 0, 21),
                (Table::Discrete, 0, 1)
            ]
        );
    }

    #[test]
    fn the_protocol_limit_splits_long_runs() {
        let regs: Vec<_> = (0..130)
            .map(|a| reg(Table::Holding, a, DataType::Uint16))
            .collect();
        assert_eq!(
            spans(&plan(&regs)),
            [(Table::Holding, 0, 125), (Table::Holding, 125, 5)]
        );
        let bits: Vec<_> = (0..2001)
            .map(|a| reg(Table::Coil, a, DataType::Bool))
            .collect();
        assert_eq!(
            spans(&plan(&bits)),
            [(Table::Coil, 0, 2000), (Table::Coil, 2000, 1)]
        );
        // A 4-register value never straddles two requests.
        let mut regs: Vec<_> = (0..123)
            .map(|a| reg(Table::Holding, a, DataType::Uint16))
            .collect();
        regs.push(reg(Table::Holding, 123, DataType::Uint64));
        assert_eq!(
            spans(&plan(&regs)),
            [(Table::Holding, 0, 123), (Table::Holding, 123, 4)]
        );
    }

    #[test]
    fn the_last_address_is_reachable() {
        let regs = vec![reg(Table::Holding, 65532, DataType::Uint64)];
        assert_eq!(spans(&plan(&regs)), [(Table::Holding, 65532, 4)]);
    }

    proptest! {
        /// Every register is in exactly one block that covers it, and every block is within the
        /// protocol's limit and holds one table.
        #[test]
        fn every_register_is_read_once_within_limits(
            specs in prop::collection::vec((0u8..4, 0u16..400, 0usize..9), 1..80)
        ) {
            let types = [DataType::Int16, DataType::Uint16, DataType::Int32, DataType::Uint32,
                DataType::Float32, DataType::Int64, DataType::Uint64, DataType::Float64];
            let regs: Vec<_> = specs.iter().map(|&(t, a, ty)| {
                let table = [Table::Holding, Table::Input, Table::Coil, Table::Discrete][usize::from(t)];
                let data_type = if table.is_bits() { DataType::Bool } else { types[ty % 8] };
                reg(table, a, data_type)
            }).collect();
            let blocks = plan(&regs);
            let mut seen = vec![0; regs.len()];
            for block in &blocks {
                prop_assert!(block.count >= 1 && block.count <= block.table.max_read());
                for &m in &block.members {
                    seen[m] += 1;
                    let r = &regs[m];
                    prop_assert_eq!(r.table, block.table);
                    prop_assert!(r.address >= u32::from(block.start));
                    prop_assert!(r.end() <= u32::from(block.start) + u32::from(block.count));
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1));
        }
    }
}
