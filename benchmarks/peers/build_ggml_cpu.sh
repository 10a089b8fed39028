#!/usr/bin/env bash
# Rebuild llama.cpp's CPU backend (libggml-cpu) without AMX, for llama-cpp-python on VMs whose CPU
# reports AMX but cannot run tile instructions (measured here: a Firecracker guest on a Sapphire
# Rapids host; the package's native build dies with SIGILL on `tilezero` in ggml_backend_amx_mul_mat
# at the first decode, even after arch_prctl(ARCH_REQ_XCOMP_PERM) succeeds).
#
#   bash benchmarks/peers/build_ggml_cpu.sh SRC_LLAMA_CPP VENV OUT_LIB_DIR
#   LLAMA_CPP_LIB_PATH=OUT_LIB_DIR VENV/bin/python benchmarks/peers/all_peers.py ...
#
# SRC_LLAMA_CPP is the vendor/llama.cpp of the installed llama-cpp-python's own sdist (same commit,
# so the C ABI matches); OUT_LIB_DIR gets the package's libllama/libggml/libggml-base and the new
# libggml-cpu (its RUNPATH is $ORIGIN, so libllama picks it up from there). Every x86 extension the
# host has is kept (AVX2, AVX-512 F/VBMI/VNNI/BF16, AVX-VNNI): weight repacking (Q4_0 → 8x8) stays on.
# Only the ggml-cpu target is compiled: about 3 minutes on one core.
set -euo pipefail
SRC=${1:?llama.cpp source (llama_cpp_python-*/vendor/llama.cpp)}
VENV=${2:?venv with llama-cpp-python}
OUT=${3:?output lib folder}
BUILD=${BUILD_DIR:-$(mktemp -d)}
PKG_LIB=$("$VENV/bin/python" -c "import importlib.util, pathlib; \
print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_CURL=OFF >/dev/null
cmake --build "$BUILD" --target ggml-cpu -j "$(nproc)"
mkdir -p "$OUT"
cp -f "$PKG_LIB"/lib* "$OUT"/
for name in "$OUT"/libggml-cpu.so*; do cp -f "$(readlink -f "$BUILD"/bin/libggml-cpu.so)" "$name"; done
echo "libggml-cpu without AMX in $OUT; run with LLAMA_CPP_LIB_PATH=$OUT"
