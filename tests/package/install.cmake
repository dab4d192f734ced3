# Fixture setup of the package tests: a fresh install of the relbias build tree, so files left
# by an earlier install (a renamed header) cannot make find_package pass by accident.
#   cmake -DBUILD_DIR=... -DPREFIX=... -DINCLUDE_DIR=include -DPACKAGE_DIR=share/cmake/relbias -P install.cmake
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed: ${result}")
endif()
foreach(file ${INCLUDE_DIR}/relbias/relbias.hpp ${PACKAGE_DIR}/relbiasConfig.cmake
             ${PACKAGE_DIR}/relbiasConfigVersion.cmake ${PACKAGE_DIR}/relbiasTargets.cmake)
  if(NOT EXISTS "${PREFIX}/${file}")
    message(FATAL_ERROR "the install lacks ${file}")
  endif()
endforeach()
