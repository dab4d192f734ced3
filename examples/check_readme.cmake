# The README's quick start must be examples/01_quick_start.cpp to the byte, so that the code a
# user copies from the README is the code this project compiles and runs.
#   cmake -DREADME=... -DEXAMPLE=... -P check_readme.cmake
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
set(marker "<!-- quick start: examples/01_quick_start.cpp -->\n```cpp\n")
string(FIND "${readme}" "${marker}" start)
if(start EQUAL -1)
  message(FATAL_ERROR "README.md has no quick-start block after the marker")
endif()
string(LENGTH "${marker}" marker_length)
math(EXPR start "${start} + ${marker_length}")
string(SUBSTRING "${readme}" ${start} -1 rest)
string(FIND "${rest}" "```" end)
string(SUBSTRING "${rest}" 0 ${end} block)
if(NOT block STREQUAL example)
  message(FATAL_ERROR "README.md's quick start differs from examples/01_quick_start.cpp")
endif()
