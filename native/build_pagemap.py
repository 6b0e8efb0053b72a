"""Builds the cffi extension ``vmbeam_kvm._pagemap`` from native/pagemap.c (API mode)."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef("""
    int vmbeam_compare_pagemaps(int fd_a, uint64_t vaddr_a, int fd_b, uint64_t vaddr_b,
                                uint64_t npages, uint64_t out[4]);
""")
ffibuilder.set_source("vmbeam_kvm._pagemap", (HERE / "pagemap.c").read_text(),
                      extra_compile_args=["-O2"])

if __name__ == "__main__":
    import shutil
    built = ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "native"), verbose=False)
    # Next to the package sources so an editable install imports it.
    shutil.copy2(built, HERE.parent / "vmbeam_kvm" / Path(built).name)
