#!/usr/bin/env bash
# The file operations of issue 10's acceptance 1, run into directory $1 (the
# writable mount, and a native directory to compare it with).  Deterministic:
# two runs into two directories leave the same bytes (diff -r), except git's
# index (a cache of stat data, machine-specific by design).
# $WORK: a scratch directory for the inputs (made once); $FILES: files in the tar.
set -euo pipefail
T=$1
WORK=${WORK:?set WORK to a scratch directory}
FILES=${FILES:-10000}
export LC_ALL=C TZ=UTC
export GIT_AUTHOR_NAME=p2pfs GIT_AUTHOR_EMAIL=p2pfs@example.invalid
export GIT_COMMITTER_NAME=p2pfs GIT_COMMITTER_EMAIL=p2pfs@example.invalid
export GIT_AUTHOR_DATE="2026-01-01T00:00:00Z" GIT_COMMITTER_DATE="2026-01-01T00:00:00Z"
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1

# inputs, made once: a tar of $FILES files, a tree for rsync, random bytes
if [ ! -f "$WORK/tree.tar" ]; then
    mkdir -p "$WORK/tree" "$WORK/rsync-src/sub/deeper"
    head -c 4194304 /dev/urandom > "$WORK/random.bin"
    for ((d = 0; d < 100; d++)); do
        mkdir -p "$WORK/tree/dir$d"
    done
    for ((i = 0; i < FILES; i++)); do
        printf 'file %d\n%*s\n' "$i" $((i % 700)) "" > "$WORK/tree/dir$((i % 100))/f$i.txt"
    done
    tar -C "$WORK" --sort=name --mtime=2026-01-01 -cf "$WORK/tree.tar" tree
    cp "$WORK/random.bin" "$WORK/rsync-src/blob"
    echo small > "$WORK/rsync-src/sub/small"
    ln -s ../blob "$WORK/rsync-src/sub/link"
    chmod 0750 "$WORK/rsync-src/sub/deeper"
fi

cd "$T"
# rename over an existing file, across directories, a whole directory
echo first > a.txt
echo second > b.txt
mv a.txt b.txt
mkdir -p one/two three
echo moved > one/two/file
mv one/two/file three/file
mv one three/one-moved
# truncate down and up, random writes, a sparse file
head -c 300000 "$WORK/random.bin" > trunc.bin
truncate -s 1000 trunc.bin
truncate -s 200000 trunc.bin
cp "$WORK/random.bin" random.bin
for off in 7 65535 65536 1000000 3000001 4194000; do
    dd if="$WORK/random.bin" of=random.bin bs=1 skip=$((off / 3)) seek=$off count=333 \
        conv=notrunc status=none
done
truncate -s 10M sparse.bin
printf 'in the middle' | dd of=sparse.bin bs=1 seek=5000000 conv=notrunc status=none
printf 'past the end' | dd of=sparse.bin bs=1 seek=12000000 conv=notrunc status=none
# an unlinked file that stays open keeps working until it is closed
exec {fd}<>open-file
echo "written before the unlink" >&$fd
rm open-file
echo "written after the unlink" >&$fd
cat "/proc/self/fd/$fd" > seen-through-the-open-file
exec {fd}>&-
# tar x of $FILES files, rsync -a in
tar -xf "$WORK/tree.tar"
rsync -a "$WORK/rsync-src/" rsynced/
# git: init, add, commit, gc
git init -q repo
cp -r tree/dir1 tree/dir2 repo/
echo "# a repository in a drive" > repo/README
git -C repo -c pack.threads=1 add -A
git -C repo commit -q -m "first"
echo "more" >> repo/README
git -C repo mv dir2 renamed
git -C repo commit -q -a -m "second"
git -C repo -c pack.threads=1 -c gc.auto=0 gc -q
rm -f repo/.git/index  # stat data of this machine: rebuilt below, compared apart
git -C repo reset -q
git -C repo status --porcelain > git-status.txt
rm -f repo/.git/index
