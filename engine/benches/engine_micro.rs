//! Micro-benchmarks of the hot pure functions: batch validation (CRC-32C), index lookups.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_engine::batch::{self, BatchBuilder, OffsetCheck};
use keel_engine::segment::index::OffsetIndex;

fn validation(c: &mut Criterion) {
    let mut group = c.benchmark_group("validate");
    for size in [1024usize, 16 * 1024, 64 * 1024, 1024 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let b = BatchBuilder {
            records_count: 10,
            ..Default::default()
        }
        .build(&payload);
        group.throughput(Throughput::Bytes(b.len() as u64));
        group.bench_with_input(BenchmarkId::new("batch", size), &b, |bench, b| {
            bench.iter(|| batch::validate(std::hint::black_box(b), OffsetCheck::Dense).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("crc32c", size), &b, |bench, b| {
            bench.iter(|| crc32c::crc32c(std::hint::black_box(&b[21..])))
        });
    }
    group.finish();
}

fn index_lookup(c: &mut Criterion) {
    // A full 1 GiB segment indexed every 4 KiB: 262,144 entries.
    let mut index = OffsetIndex::default();
    for i in 1..262_144u32 {
        index.append(i * 10, i * 4096);
    }
    c.bench_function("offset_index_lookup_262k", |bench| {
        let mut target = 0u32;
        bench.iter(|| {
            target = target.wrapping_add(7_919) % 2_621_440;
            index.lookup(std::hint::black_box(target))
        })
    });
}

criterion_group!(benches, validation, index_lookup);
criterion_main!(benches);
