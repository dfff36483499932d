{
  "targets": [
    {
      "target_name": "kvmmem",
      "sources": ["kvmmem.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "OPENSSL_SUPPRESS_DEPRECATED", "NAPI_DISABLE_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-O2"],
      "cflags_cc!": ["-fno-exceptions"]
    }
  ]
}
