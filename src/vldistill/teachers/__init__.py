"""Everything about the teachers: assembling them from a path, hub id or ensemble config (`assemble`),
combining several into one (`ensemble`), and the teacher cache that stands in for them (`cache`: the
on-disk store, its build and the cached teacher that reads it)."""
