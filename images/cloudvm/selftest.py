"""Host side of images/cloudvm/selftest.sh: proves the nested zero-copy path.

L0 (this process) makes a memfd "beam region", hot-plugs it into cloud VM l1a
as ivshmem-plain, checks the L1 sees it (BAR2 above 4 GiB, trailer readable
through /dev/mem), boots the test guest as L2 inside l1a with its RAM on the
BAR, and checks from L0 that the L2's live state is in the memfd.  Then a second
cloud VM l1b maps the same memfd (cross-L1 write/read, and an L2 started there
on the sysfs resource2 file), and both are unplugged with the fd release
checked.  Every QEMU is started here and killed in `finally`; pids are also in
WORK/*.pid for the shell wrapper's trap.  Results: stdout + WORK/result.json.
"""

import argparse
import asyncio
import json
import os
import secrets
import signal
import struct
import subprocess
import sys
import time

from qemu.qmp import QMPClient

MiB = 1 << 20
L2_RAM = 256 * MiB
TRAILER_OFF = L2_RAM                 # the 4 KiB after the L2's RAM
REGION = L2_RAM + 4096
# ivshmem asserts (aborting the whole L1 QEMU!) unless the BAR size is a power
# of two, and QEMU refuses a backing file smaller than size: grow the memfd.
BAR_SIZE = 1 << (REGION - 1).bit_length()
STATE_MAGIC = 0x5642454D54475354     # testguest's state block (images/testguest)
MEMFD_NAME = "vmbeam-selftest"

# Run inside the L1 with python3 -c: peek/poke a physical range through a file.
PEEK = """
import mmap, os, sys
path, off, n = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0)
pg = off & ~4095
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, off - pg + n, mmap.MAP_SHARED, mmap.PROT_READ, offset=pg)
sys.stdout.write(m[off - pg:off - pg + n].hex())
"""
POKE = """
import mmap, os, sys
path, off, data = sys.argv[1], int(sys.argv[2], 0), bytes.fromhex(sys.argv[3])
pg = off & ~4095
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, off - pg + len(data), mmap.MAP_SHARED, offset=pg)
m[off - pg:off - pg + len(data)] = data
"""
# 64 MiB written/read in 1 MiB slices, 3 rounds; first /dev/shm round also
# allocates pages, so the median is reported.
BANDWIDTH = """
import json, mmap, os, statistics, sys, time
path, off = sys.argv[1], int(sys.argv[2], 0)
N, B = 64 << 20, 1 << 20
blk = bytes([0xa5]) * B
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
if path.startswith("/dev/shm/"):
    os.ftruncate(fd, N)
m = mmap.mmap(fd, N, mmap.MAP_SHARED, offset=off)
w, r = [], []
for _ in range(3):
    t = time.perf_counter()
    for o in range(0, N, B):
        m[o:o + B] = blk
    w.append(64 / (time.perf_counter() - t))
    t = time.perf_counter()
    for o in range(0, N, B):
        m[o:o + B]
    r.append(64 / (time.perf_counter() - t))
m.close()
if path.startswith("/dev/shm/"):
    os.unlink(path)
print(json.dumps({"write_MBps": round(statistics.median(w)), "read_MBps": round(statistics.median(r))}))
"""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


class L1:
    """One cloud VM: its QEMU process, QMP session and agent channel."""

    def __init__(self, name, out, work):
        self.name, self.out, self.work = name, out, work
        self.proc = None
        self.qmp = None
        self.agent = None
        self.seq = 0
        self.serial = f"{work}/{name}.serial.log"
        self.qmp_sock = f"{work}/{name}.qmp"
        self.agent_sock = f"{work}/{name}.agent"

    def argv(self):
        img = f"{self.out}/cloudvm"
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "2G", "-smp", "2",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", f"{self.out}/linux/vmlinux", "-initrd", f"{img}/initrd.img",
            "-append", f"console=ttyS0 root=/dev/vda vmbeam.name={self.name}",
            "-drive", f"file={img}/rootfs.ext4,if=virtio,format=raw,snapshot=on",
            "-drive", f"file={self.work}/src.ext4,if=virtio,format=raw,readonly=on",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={self.agent_sock},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=org.vmbeam.agent",
            # Room for hot-plugged 64-bit BARs: SeaBIOS sizes each (empty) root
            # port's prefetchable window from pref64-reserve and puts it above
            # 4 GiB; the host bridge's 64-bit hole must hold all of them.
            "-global", "q35-pcihost.pci-hole64-size=64G",
            "-device", "pcie-root-port,id=rp0,chassis=1,slot=1,pref64-reserve=8G",
            "-device", "pcie-root-port,id=rp1,chassis=2,slot=2,pref64-reserve=8G",
        ]

    async def start(self):
        for p in (self.serial, self.qmp_sock, self.agent_sock):
            if os.path.exists(p):
                os.unlink(p)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=open(f"{self.work}/{self.name}.qemu.log", "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        with open(f"{self.work}/{self.name}.pid", "w") as f:
            f.write(f"{self.proc.pid}\n")
        while True:
            check(self.proc.poll() is None, f"{self.name}: QEMU exited rc={self.proc.returncode}")
            check(time.monotonic() - t0 < 120, f"{self.name}: no ready line in 120 s")
            try:
                with open(self.serial, errors="replace") as f:
                    if f"VMBEAM-CLOUDVM ready name={self.name}" in f.read():
                        break
            except FileNotFoundError:
                pass
            await asyncio.sleep(0.1)
        self.boot_s = time.monotonic() - t0
        self.qmp = QMPClient(self.name)
        await self.qmp.connect(self.qmp_sock)
        self.agent = await asyncio.open_unix_connection(self.agent_sock)
        # The agent is started just before the ready line; give it a moment.
        await asyncio.wait_for(self.sh("true"), 60)
        log(f"{self.name}: ready after {self.boot_s:.1f} s (pid {self.proc.pid})")

    async def request(self, req, timeout=120):
        self.seq += 1
        req = dict(req, id=self.seq, timeout=timeout)
        reader, writer = self.agent
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        rep = json.loads(await asyncio.wait_for(reader.readline(), timeout + 10))
        check(rep["id"] == self.seq, f"{self.name}: agent reply out of order")
        return rep["rc"], rep["out"]

    async def sh(self, cmd, timeout=120, ok=True):
        rc, out = await self.request({"cmd": cmd}, timeout)
        check(not ok or rc == 0, f"{self.name}: `{cmd[:60]}...` rc={rc}: {out}")
        return out

    async def py(self, code, *args, timeout=120):
        rc, out = await self.request({"argv": ["python3", "-c", code, *map(str, args)]}, timeout)
        check(rc == 0, f"{self.name}: python rc={rc}: {out}")
        return out

    def memfd_refs(self):
        """How this QEMU still holds the region: fds and mappings naming the memfd."""
        pid = self.proc.pid
        fds = [n for n in os.listdir(f"/proc/{pid}/fd")
               if MEMFD_NAME in os.readlink(f"/proc/{pid}/fd/{n}")]
        with open(f"/proc/{pid}/maps") as f:
            maps = [line for line in f if MEMFD_NAME in line]
        return fds, maps

    async def attach(self, fd, bus):
        """add-fd + object-add + device_add; returns (BDF, BAR2 as seen by the L1)."""
        t0 = time.monotonic()
        self.qmp.send_fd_scm(fd)
        r = await self.qmp.execute("add-fd", {"fdset-id": 1})
        self.fdset = r["fdset-id"]
        # memory-backend-file opens mem-path with plain open(): /dev/fdset/N is
        # not understood there, but /proc/self/fd/N of QEMU's copy is.
        await self.qmp.execute("object-add", {
            "qom-type": "memory-backend-file", "id": "r1",
            "mem-path": f"/proc/self/fd/{r['fd']}", "size": BAR_SIZE, "share": True})
        await self.qmp.execute("device_add", {"driver": "ivshmem-plain", "memdev": "r1",
                                              "id": "iv1", "bus": bus})
        # The guest (ACPI hot-plug, acpiphp) enumerates the device and assigns
        # its BARs; QEMU reports where, once it is done.
        while True:
            dev = find_pci(await self.qmp.execute("query-pci"), "iv1")
            bar2 = [r for r in (dev or {}).get("regions", []) if r["bar"] == 2]
            # Unassigned or not yet enabled BARs read as 0 / all-ones.
            if bar2 and bar2[0]["address"] not in (0, -1, 0xffffffffffffffff):
                break
            check(time.monotonic() - t0 < 30, f"{self.name}: BAR2 not assigned in 30 s")
            await asyncio.sleep(0.1)
        bdf = "0000:%02x:%02x.%d" % (dev["bus"], dev["slot"], dev["function"])
        # L1 side: the kernel's view (sysfs `resource`, line 3 = BAR2).  No
        # driver binds ivshmem, so nothing guarantees memory decoding is on
        # (ACPI hot-plug leaves it on, native pciehp does not): `enable` it.
        out = await self.sh(f"d=/sys/bus/pci/devices/{bdf}; for i in $(seq 100); do "
                            f"[ -e $d/resource2 ] && break; sleep 0.1; done; "
                            f"echo 1 > $d/enable; "
                            f"cat $d/vendor $d/device; sed -n 3p $d/resource")
        vendor, device, res = out.split("\n")[:3]
        check((vendor, device) == ("0x1af4", "0x1110"), f"{bdf} is {vendor}:{device}")
        start, end = (int(x, 16) for x in res.split()[:2])
        check(start == bar2[0]["address"], f"L1 BAR2 {start:#x} != QEMU's {bar2[0]['address']:#x}")
        check(end - start + 1 == BAR_SIZE, f"BAR2 size {end - start + 1:#x}")
        self.attach_s = time.monotonic() - t0
        log(f"{self.name}: ivshmem {bdf} BAR2 {start:#x} ({BAR_SIZE >> 20} MiB) "
            f"visible {self.attach_s:.2f} s after add-fd")
        return bdf, start

    async def detach(self):
        """device_del (guest ejects via ACPI) + object-del + remove-fd, then
        wait until QEMU has really closed and unmapped the memfd."""
        t0 = time.monotonic()
        with self.qmp.listener("DEVICE_DELETED") as listener:
            await self.qmp.execute("device_del", {"id": "iv1"})
            while True:
                ev = await asyncio.wait_for(listener.get(), 30)
                if ev["data"].get("device") == "iv1":
                    break
        t_del = time.monotonic() - t0
        await self.qmp.execute("object-del", {"id": "r1"})
        await self.qmp.execute("remove-fd", {"fdset-id": self.fdset})
        # The RAMBlock is freed after an RCU grace period: poll, don't assume.
        while True:
            fds, maps = self.memfd_refs()
            if not fds and not maps:
                break
            check(time.monotonic() - t0 < 20, f"{self.name}: memfd still held: {fds} {maps}")
            await asyncio.sleep(0.05)
        t_rel = time.monotonic() - t0
        log(f"{self.name}: DEVICE_DELETED after {t_del:.2f} s, memfd closed+unmapped "
            f"after {t_rel:.2f} s")
        return {"device_deleted_s": round(t_del, 2), "released_s": round(t_rel, 2)}

    async def start_l2(self, mem_path, offset, tag):
        """Boots the test guest inside this L1 on the given RAM; returns
        (pid, ms from exec to first `ok=1` heartbeat, boot line)."""
        out = await self.sh(f"""
            log=/tmp/l2-{tag}.log; rm -f $log
            t0=$(date +%s%N)
            setsid qemu-system-x86_64 -accel tcg -machine q35,memory-backend=ram0 -m {L2_RAM >> 20}M \
              -object memory-backend-file,id=ram0,mem-path={mem_path},offset={offset},size={L2_RAM >> 20}M,share=on \
              -kernel /opt/vmbeam/testguest.bin -append touch=70 -nodefaults -display none \
              -serial file:$log </dev/null >/tmp/l2-{tag}.out 2>&1 &
            pid=$!
            until grep -q 'ok=1' $log 2>/dev/null; do
                kill -0 $pid 2>/dev/null || {{ echo "L2 died:"; cat /tmp/l2-{tag}.out; exit 1; }}
                sleep 0.05
            done
            echo "$pid $(( ($(date +%s%N) - t0) / 1000000 ))"
            grep -m1 VMBEAM-TESTGUEST $log""")
        first, boot = out.strip().split("\n")[:2]
        pid, ms = map(int, first.split())
        log(f"{self.name}: L2 '{tag}' on {mem_path} @ {offset:#x}: first ok=1 heartbeat "
            f"{ms} ms after exec; {boot}")
        return pid, ms, boot

    async def l2_last_hb(self, tag):
        return (await self.sh(f"grep '^HB' /tmp/l2-{tag}.log | tail -n1")).strip()

    async def stop_l2(self, pid, tag):
        await self.sh(f"kill {pid}; for i in $(seq 100); do kill -0 {pid} 2>/dev/null || exit 0; "
                      f"sleep 0.1; done; echo 'L2 {tag} did not quit'; exit 1")

    async def stop(self, graceful=True):
        """QMP quit when all went well, else SIGTERM; SIGKILL after 5 s.  The
        root disk is snapshot=on, so nothing of the L1 is worth saving."""
        if self.agent:
            self.agent[1].close()
        if self.qmp:
            if graceful:
                try:
                    await asyncio.wait_for(self.qmp.execute("quit"), 3)
                except Exception:
                    pass
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 3)
            except Exception:
                pass
        if self.proc and self.proc.poll() is None:
            if not graceful:
                self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in (self.qmp_sock, self.agent_sock, f"{self.work}/{self.name}.pid"):
            if os.path.exists(p):
                os.unlink(p)


def find_pci(buses, qdev_id):
    """Depth-first search of query-pci output (devices behind root ports)."""
    for bus in buses:
        for dev in bus.get("devices", []):
            if dev.get("qdev_id") == qdev_id:
                return dev
            found = find_pci([dev["pci_bridge"]], qdev_id) if dev.get("pci_bridge") else None
            if found:
                return found
    return None


def l2_state(fd, pages):
    """The test guest's state block, found in the memfd by magic + page count
    (the magic also occurs as an immediate in its code)."""
    data = os.pread(fd, 8 * MiB, 0)
    i = data.find(struct.pack("<Q", STATE_MAGIC))
    while i >= 0:
        if i % 8 == 0:
            magic, nonce, npages, rnd, cursor, bad, seq, _ = struct.unpack_from("<8Q", data, i)
            if npages == pages:
                return {"offset": i, "nonce": nonce, "round": rnd, "bad": bad, "seq": seq}
        i = data.find(struct.pack("<Q", STATE_MAGIC), i + 1)
    return None


def hb_seq(line):
    return int(line.split("seq=")[1].split()[0])


async def main(args):
    res = {"bar_size": BAR_SIZE, "region_bytes": REGION}
    l1s = []
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        # Region: 256 MiB of L2 RAM + a 4 KiB trailer we can recognise anywhere.
        os.ftruncate(fd, REGION)
        trailer = (b"VMBEAM-TRAILER " + secrets.token_hex(16).encode()).ljust(4096, b".")
        os.pwrite(fd, trailer, TRAILER_OFF)
        os.ftruncate(fd, BAR_SIZE)        # sparse: the rest costs nothing
        log(f"memfd {REGION} bytes (+ hole to {BAR_SIZE >> 20} MiB for the power-of-two BAR)")

        a = L1("l1a", args.out, args.work)
        l1s.append(a)
        await a.start()
        res["l1a_boot_to_ready_s"] = round(a.boot_s, 2)
        bdf_a, bar_a = await a.attach(fd, "rp0")
        res["l1a"] = {"bdf": bdf_a, "bar2": hex(bar_a), "hotplug_to_visible_s": round(a.attach_s, 2)}
        check(bar_a >= 1 << 32, f"BAR2 {bar_a:#x} below 4 GiB")

        # Trailer through /dev/mem (write-back mapping) and through sysfs resource2 (UC-).
        got = bytes.fromhex(await a.py(PEEK, "/dev/mem", bar_a + TRAILER_OFF, 4096))
        check(got == trailer, f"trailer via /dev/mem: {got[:40]!r}")
        got = bytes.fromhex(await a.py(PEEK, f"/sys/bus/pci/devices/{bdf_a}/resource2",
                                       TRAILER_OFF, 4096))
        check(got == trailer, f"trailer via resource2: {got[:40]!r}")
        log("l1a: trailer read back via /dev/mem at BAR2+256M and via resource2")

        # Bandwidth: BAR via /dev/mem (past the trailer, inside the BAR) vs /dev/shm.
        bw = {}
        for k, path, off in (("devmem_bar", "/dev/mem", bar_a + TRAILER_OFF + 4096),
                             ("resource2_bar", f"/sys/bus/pci/devices/{bdf_a}/resource2",
                              TRAILER_OFF + 4096),
                             ("dev_shm", "/dev/shm/vmbeam-bw", 0)):
            bw[k] = json.loads(await a.py(BANDWIDTH, path, off))
        res["bandwidth_64MiB_in_l1a"] = bw
        log(f"l1a bandwidth (64 MiB mmap, median of 3): {bw}")

        # L2 inside l1a on the BAR, through /dev/mem at the BAR's physical address.
        pid2, ms, boot = await a.start_l2("/dev/mem", bar_a, "devmem")
        pages = int(boot.split("pages=")[1].split()[0])
        res["l2_devmem_first_ok_hb_ms"] = ms
        await asyncio.sleep(2)
        s1 = l2_state(fd, pages)
        check(s1 is not None, "L2 state block not found in the host memfd")
        await asyncio.sleep(1)
        s2 = l2_state(fd, pages)
        hb = await a.l2_last_hb("devmem")
        check(s2["seq"] > s1["seq"] and s2["bad"] == 0 and "ok=1" in hb,
              f"L2 state in memfd not advancing: {s1} {s2} {hb}")
        check(abs(hb_seq(hb) - s2["seq"]) <= 50, f"memfd seq {s2['seq']} vs L2 log {hb}")
        nz = sum(1 for o in range(0, L2_RAM, 4096) if any(os.pread(fd, 4096, o)))
        check(nz >= pages, f"only {nz} non-zero pages in memfd, L2 touched {pages}")
        res["host_sees_l2"] = {"state_offset": hex(s2["offset"]), "seq_1s_apart": [s1["seq"], s2["seq"]],
                               "l2_log_last_hb": hb, "nonzero_pages": nz, "l2_touched_pages": pages}
        log(f"host: L2 state block at guest-phys {s2['offset']:#x} in the memfd, seq "
            f"{s1['seq']}->{s2['seq']} (L2 log: {hb}); {nz} non-zero pages (L2 touched {pages})")

        if args.two:
            b = L1("l1b", args.out, args.work)
            l1s.append(b)
            await b.start()
            bdf_b, bar_b = await b.attach(fd, "rp1")
            res["l1b"] = {"bdf": bdf_b, "bar2": hex(bar_b), "boot_to_ready_s": round(b.boot_s, 2)}
            # l1b sees the L2 running in l1a live: its state block, through l1b's BAR.
            raw = bytes.fromhex(await b.py(PEEK, "/dev/mem", bar_b + s2["offset"], 64))
            magic, nonce, _, _, _, _, seq_b, _ = struct.unpack("<8Q", raw)
            check(magic == STATE_MAGIC and nonce == s2["nonce"] and seq_b >= s2["seq"],
                  f"l1b sees {magic:#x} nonce {nonce:#x} seq {seq_b}")
            # Cross-L1 write/read in the trailer page.
            token = secrets.token_bytes(32)
            await a.py(POKE, "/dev/mem", bar_a + TRAILER_OFF + 2048, token.hex())
            got = bytes.fromhex(await b.py(PEEK, "/dev/mem", bar_b + TRAILER_OFF + 2048, 32))
            check(got == token and os.pread(fd, 32, TRAILER_OFF + 2048) == token,
                  "token written by l1a not seen by l1b / host")
            res["cross_l1"] = {"l1b_sees_l2_seq": seq_b, "token_l1a_to_l1b": "ok"}
            log(f"l1b: sees l1a's L2 state live (seq {seq_b}); token written via l1a's BAR "
                f"read back via l1b's BAR and in the host memfd")

            # Relocate by hand (cold): stop the L2 in l1a, boot one in l1b on the
            # same frames, this time through sysfs resource2 (offset 0).
            await a.stop_l2(pid2, "devmem")
            pid3, ms3, boot3 = await b.start_l2(f"/sys/bus/pci/devices/{bdf_b}/resource2", 0, "res2")
            pages3 = int(boot3.split("pages=")[1].split()[0])
            await asyncio.sleep(2)
            s3 = l2_state(fd, pages3)
            hb3 = await b.l2_last_hb("res2")
            check(s3 is not None and s3["nonce"] != s2["nonce"] and "ok=1" in hb3,
                  f"L2 on l1b resource2 not visible in memfd: {s3} {hb3}")
            res["l2_resource2_first_ok_hb_ms"] = ms3
            res["l2_resource2_host_seq"] = s3["seq"]
            log(f"host: new L2 (on l1b resource2) state in memfd, seq {s3['seq']}, {hb3}")
            await b.stop_l2(pid3, "res2")
            res["l1b_unplug"] = await b.detach()
        else:
            await a.stop_l2(pid2, "devmem")

        res["l1a_unplug"] = await a.detach()
        res["ok"] = True
    finally:
        for l1 in reversed(l1s):
            await l1.stop(graceful=res.get("ok", False))
        os.close(fd)
        with open(f"{args.work}/result.json", "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="build/images")
    ap.add_argument("--work", required=True, help="scratch dir with src.ext4")
    ap.add_argument("--one", dest="two", action="store_false", help="skip the second L1")
    args = ap.parse_args()

    async def run():
        # SIGTERM (from the wrapper's trap) cancels main(), whose finally-
        # clause then stops every QEMU and closes the memfd.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        await main(args)

    try:
        asyncio.run(run())
    except Fail as e:
        log(f"FAIL: {e}")
        sys.exit(1)
    except asyncio.CancelledError:
        log("interrupted")
        sys.exit(143)
