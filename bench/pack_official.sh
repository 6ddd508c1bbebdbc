#!/usr/bin/env bash
# Packs what bench/gpu_train_step.sh needs of the official VideoMamba code into .official/ (git-ignored), the carry
# folder of the device call: official.tar.gz (a `git archive` of mamba/, causal-conv1d/, videomamba/video_sm/ and
# videomamba/video_mm/ at the mirror's HEAD), COMMIT, and the sm_90 build patch of ../shared/gpu (GPU.md). Run it
# from the repository root:  bash bench/pack_official.sh [BARE_GIT_DIR]
# (default: $OFFICIAL_GIT or /work/.mirror/OpenGVLab+VideoMamba/repo). The patch is looked for at $OFFICIAL_PATCH,
# ../shared/gpu/ and /work/shared/gpu/.
set -euo pipefail
git_dir=${1:-${OFFICIAL_GIT:-/work/.mirror/OpenGVLab+VideoMamba/repo}}
name=official-videomamba-sm90.patch
patch=${OFFICIAL_PATCH:-}
for candidate in "$patch" "../shared/gpu/$name" "../../shared/gpu/$name" "/work/shared/gpu/$name"; do
  if [ -n "$candidate" ] && [ -f "$candidate" ]; then patch=$candidate; break; fi
done
[ -f "$patch" ] || { echo "pack_official.sh: $name not found (set OFFICIAL_PATCH)" >&2; exit 2; }
git --git-dir="$git_dir" rev-parse --verify HEAD >/dev/null || { echo "pack_official.sh: $git_dir is not a git repository" >&2; exit 2; }
rm -rf .official
mkdir -p .official
git --git-dir="$git_dir" archive --format=tar HEAD mamba causal-conv1d videomamba/video_sm videomamba/video_mm \
  | gzip -9 > .official/official.tar.gz
git --git-dir="$git_dir" rev-parse HEAD > .official/COMMIT
cp "$patch" .official/
grep -qx '/.official/' .gitignore 2>/dev/null || echo '/.official/' >> .gitignore
echo "packed $(cat .official/COMMIT) into .official/:"
du -sh .official/*
